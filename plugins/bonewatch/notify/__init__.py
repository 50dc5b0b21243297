"""Notification shell: render digests (pure), queue them in the outbox, send through SMTP."""
