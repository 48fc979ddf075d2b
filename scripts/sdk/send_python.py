#!/usr/bin/env python3
"""Sends track, identify, page, screen, group and alias through one Segment-API library, the way an app would,
to HOST (a relay, or capture_server.py), and exits 0 only when the library reported no error.

    send_python.py segment|rudder HOST WRITE_KEY USER_ID [gzip]
"""
import sys

lib, host, write_key, user = sys.argv[1:5]
gzip = len(sys.argv) > 5 and sys.argv[5] == "gzip"
errors = []


def on_error(e, batch):
    errors.append(repr(e))


if lib == "segment":
    import segment.analytics as analytics
    from segment.analytics.version import VERSION
else:
    import rudderstack.analytics as analytics
    from rudderstack.analytics.version import VERSION

analytics.write_key = write_key
if lib == "segment":
    analytics.host = host
else:
    analytics.dataPlaneUrl = host
analytics.on_error = on_error
if len(sys.argv) > 5:
    analytics.gzip = gzip
analytics.max_retries = 2
analytics.sync_mode = False

ts = "2026-01-02T03:04:05.678000+00:00"
analytics.track(user, "Signed Up", {"plan": "pro", "seats": 3, "nested": {"a": 1}}, message_id=f"{lib}-track-{user}")
analytics.identify(user, {"email": f"{user}@example.com", "name": "Ada"}, message_id=f"{lib}-identify-{user}")
analytics.page(user, "Docs", "Pricing", {"path": "/pricing"}, message_id=f"{lib}-page-{user}")
analytics.screen(user, "App", "Home", {"tab": 1}, message_id=f"{lib}-screen-{user}")
analytics.group(user, "org-1", {"name": "Acme"}, message_id=f"{lib}-group-{user}")
analytics.alias("old-" + user, user, message_id=f"{lib}-alias-{user}")
analytics.flush()
analytics.shutdown()
print(f"{lib} {VERSION}: errors={errors}")
sys.exit(1 if errors else 0)
