"""The lab: spotguard against an embedded AWS (moto) that behaves like EC2.

`spotguard.lab.world.MotoWorld` runs moto in-process, builds a deployment in it
and drives the dynamics moto lacks (interruptions, re-fulfilment, target
health, capacity errors). Tests use it; the lab's replays will too.
"""
