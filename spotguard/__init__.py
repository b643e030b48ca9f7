"""spotguard: keeps a service on EC2 Spot available through interruptions."""

__version__ = "0.1.0"
