"""Data-quality monitoring and its static dashboard.

- `metrics`: the functional core: a night's deliveries -> per-feed status, red/amber/green,
  problems, alert volume and acknowledgement latency (pure; the clock is passed in).
- `record`: the shell the nightly run calls: reads the store, writes `dq_*` rows, emails the
  data team about new problems through the outbox.
- `pages`: recorded metrics -> HTML pages with Plotly charts (pure; plotly.js inlined).
- `build`: `bonewatch dashboard --out DIR`: reads the store, builds the GX Data Docs next to the
  pages, writes everything (opens from disk, no network).
"""
