"""CDS Hooks 2.0 service of `bonewatch serve`: the EHR asks for bonewatch's advice when a chart
opens (`patient-view`) or a bisphosphonate order is about to be signed (`order-sign`).

`service` (routes, mounted by `web.create_app`), `auth` (the EHR's JWT), `hooks` (what each hook
answers), `cards` (alerts and findings as cards), `prefetch` (the EHR's FHIR data as lab rows).
"""
