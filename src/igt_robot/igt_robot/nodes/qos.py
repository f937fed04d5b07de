"""QoS profiles, chosen on purpose and named for what they carry.

* SAFETY_LATCHED -- motion permission and safety status: RELIABLE + TRANSIENT_LOCAL,
  depth 1, so a node that starts (or restarts) late sees the current permission at
  once instead of assuming one. Liveliness is AUTOMATIC with a lease so a dead
  supervisor is noticed by subscribers.
* SCANNER_STATE -- scanner phase with heartbeat: RELIABLE, KEEP_LAST 10, VOLATILE;
  staleness is judged from the heartbeat, not from durability.
* STATE_STREAM -- high-rate state (joint states, robot state): BEST_EFFORT, depth 5;
  the newest sample is what matters, a dropped one is replaced 1/rate later.
* EVENTS -- procedure events and dose records: RELIABLE, KEEP_LAST 1000,
  TRANSIENT_LOCAL so the recorder gets events published before it joined.
* LATCHED -- slowly changing facts (accepted registration, current plan, markers).
"""
from rclpy.duration import Duration
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, LivelinessPolicy, QoSProfile,
                       ReliabilityPolicy)

SAFETY_LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL, liveliness=LivelinessPolicy.AUTOMATIC,
                            liveliness_lease_duration=Duration(seconds=1.0))
SCANNER_STATE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.VOLATILE)
STATE_STREAM = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.VOLATILE)
EVENTS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
COMMANDS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
