"""Every default of spotguard's settings, in one place.

`config` fills a key the file leaves out from here, `machine.Rules` takes its
defaults from here, and `config.example.toml` states the same values (a test
compares them). Durations are in seconds.
"""

from __future__ import annotations

from pathlib import Path

# The config file every verb reads unless --config says otherwise (or SPOTGUARD_CONFIG does).
CONFIG = Path("/etc/spotguard/config.toml")
CONFIG_ENV = "SPOTGUARD_CONFIG"

# [daemon]
STATE_DIR = Path("/var/lib/spotguard")
POLL_INTERVAL = 5.0
LOG_FORMAT = "auto"
BLIND_AFTER = 60.0  # no observation of a guard this long: alert (and, with [ha], let the other controller lead)
# The metrics endpoint has no authentication: it listens on loopback unless told otherwise.
METRICS_ADDRESS = "127.0.0.1"

# [notify.discord]
TIMEZONE = "UTC"

# [ha]
LEASE = 15.0

# [[guard]]
FAILBACK_GRACE = 600.0
STANDBY_READY_TIMEOUT = 300.0
UNHEALTHY_GRACE = 30.0
ON_REBALANCE = "ignore"
REBALANCE_HOLD = 1800.0
LATE_WARNING = 30.0  # standby not healthy this long before a doomed spot's deadline: say so
DEREGISTER_AHEAD = 5.0  # replacement late: a doomed spot leaves the group this long before its deadline
REGISTER_WHEN = "ready"  # register an instance once it answers its health check | "running": as soon as it runs
