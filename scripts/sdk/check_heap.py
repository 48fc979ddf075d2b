#!/usr/bin/env python3
"""Checks what the mock Heap received for one library's run (scripts/sdk-check): for USER_ID, each of track,
page and screen exactly once (with `heap`: the one track only), identify exactly once as user properties,
everything to APP_ID.

    check_heap.py MOCK_HEAP_URL USER_ID APP_ID LABEL [heap]
"""
import json
import sys
import time
import urllib.request

url, user, app_id, label = sys.argv[1:5]
heap_lib = len(sys.argv) > 5 and sys.argv[5] == "heap"
want_events = ["Signed Up"] if heap_lib else ["Page viewed", "Screen viewed", "Signed Up"]
deadline = time.time() + 15
while True:
    calls = json.load(urllib.request.urlopen(url + "/_calls"))
    events, users = [], []
    for c in calls:
        b = c["body"] or {}
        items = b.get("events") or b.get("users") or [b]
        for it in items:
            if it.get("identity") != user:
                continue
            it = dict(it, app_id=b.get("app_id", it.get("app_id")))
            (events if c["path"].endswith("/api/track") else users).append(it)
    done = sorted(e["event"] for e in events) == want_events and len(users) == 1
    if done or time.time() > deadline:
        break
    time.sleep(0.2)

problems = []
names = sorted(e["event"] for e in events)
if names != want_events:
    problems.append(f"track/page/screen: Heap got {names}, wanted each of {want_events} once")
if len(users) != 1:
    problems.append(f"identify: Heap got {len(users)} add_user_properties calls, wanted 1")
elif users[0].get("properties", {}).get("email") != f"{user}@example.com":
    problems.append(f"identify: properties {users[0].get('properties')}")
wrong = [x["app_id"] for x in events + users if str(x["app_id"]) != app_id]
if wrong:
    problems.append(f"app_id: {wrong} (wanted {app_id})")
for p in problems:
    print(f"FAIL {label}: {p}")
if not problems:
    print(f"ok   {label}: Heap got {', '.join(want_events)} once each and identify once as user properties, "
          f"all to app_id {app_id}")
sys.exit(1 if problems else 0)
