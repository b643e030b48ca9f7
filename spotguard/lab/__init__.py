"""The lab: spotguard against an embedded AWS (moto) that behaves like EC2, with real HTTP traffic.

`spotguard demo` and tests/test_lab.py play a `Scenario` (scenario.py) with
`run_scenario` (run.py): moto in this process (world.py, which also serves
the other tests), EC2's time and an app server per running instance
(fleet.py, app.py), a health-checking, draining load balancer on loopback that
answers moto's DescribeTargetHealth (balancer.py), spotguard as a real
`spotguard run` subprocess (guard.py), steady load (load.py), all on one
scaled clock (clock.py) and one timeline (timeline.py), summed up by
report.py. docs/lab.md describes what is modelled and how.

Nothing here is imported by the daemon's production path; moto is the
optional `lab` extra.
"""
