#!/usr/bin/env python3
"""heapapi (PyPI) pointed at the relay by its two URL attributes: one track and one add_user_properties.

    send_heap.py RELAY APP_ID IDENTITY
"""
import sys

from heapapi import HeapAPIClient

relay, app_id, identity = sys.argv[1:4]
client = HeapAPIClient(app_id)
client.track_api = f"{relay}/api/track"
client.props_api = f"{relay}/api/add_user_properties"
client.track(identity, "Signed Up", {"plan": "pro"})  # raises on a 4xx/5xx
client.add_user_properties(identity, {"email": identity + "@example.com"})
print("heapapi: ok")
