"""The interlock core (igt_robot.safety.interlock): one decision, one staleness rule, per-publisher authority."""
import pytest

from igt_robot.safety.interlock import (FOREIGN_PERMISSION, FOREIGN_SCANNER, Interlock, InterlockConfig,
                                        InterlockConfigError, node_key)
from igt_robot.scanner.phases import ScannerPhase

SCANNER, SUPERVISOR, ROGUE = 'gid-scanner', 'gid-supervisor', 'gid-rogue'


def ready(now=0.0, **config):
    lock = Interlock(InterlockConfig(**config))
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 1, now)
    lock.on_permission(SUPERVISOR, '/safety_supervisor', True, now)
    return lock


def test_motion_needs_every_input():
    lock = Interlock(InterlockConfig())
    assert lock.decide(0.0).inhibit
    assert 'no scanner state' in lock.decide(0.0).reason
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 1, 0.0)
    assert 'no motion permission' in lock.decide(0.0).reason
    lock.on_permission(SUPERVISOR, 'safety_supervisor', True, 0.0)
    assert lock.decide(0.0) == (False, 'motion permitted and scanner idle')
    lock.on_permission(SUPERVISOR, 'safety_supervisor', False, 0.0)
    assert lock.decide(0.0).inhibit


@pytest.mark.parametrize('phase', ['PREPARING', 'ACQUIRING', 'UNKNOWN'])
def test_imaging_inhibits(phase):
    lock = ready()
    lock.on_scanner(SCANNER, 'scanner_interface', phase, 2, 0.01)
    assert lock.decide(0.01) == (True, f'scanner {phase}')


def test_one_staleness_rule_and_its_bound():
    config = InterlockConfig(scanner_period=0.05, scanner_timeout=0.13, check_period=0.01)
    assert config.silence_detection_bound <= 3 * config.scanner_period
    lock = ready(scanner_period=0.05, scanner_timeout=0.13, check_period=0.01)
    assert not lock.decide(0.13).inhibit
    assert 'stale' in lock.decide(0.131).reason
    # A repeated heartbeat counter is not a fresh reading (a frozen publisher).
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 1, 0.2)
    assert lock.decide(0.2).inhibit
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 2, 0.25)
    assert not lock.decide(0.25).inhibit
    # A message already older than the timeout when it arrives is not fresh either.
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 3, 0.5, stamp_age=0.2)
    assert lock.decide(0.5).inhibit


def test_config_refuses_a_bound_beyond_three_periods():
    with pytest.raises(InterlockConfigError, match='3 scanner periods'):
        InterlockConfig(scanner_period=0.05, scanner_timeout=0.15, check_period=0.01)
    with pytest.raises(InterlockConfigError, match='shorter than the scanner period'):
        InterlockConfig(scanner_period=0.05, scanner_timeout=0.04)


def test_foreign_idle_is_ignored_and_named():
    lock = ready()
    lock.on_scanner(SCANNER, 'scanner_interface', 'ACQUIRING', 2, 0.01)
    findings = lock.on_scanner(ROGUE, '/spoofer', 'IDLE', 99, 0.02)
    assert [(f.code, f.node, f.active) for f in findings] == [(FOREIGN_SCANNER, '/spoofer', True)]
    assert lock.decide(0.02).inhibit
    assert lock.on_scanner(ROGUE, '/spoofer', 'IDLE', 100, 0.03) == []   # reported once
    # Even after the real scanner says IDLE, the foreign publisher keeps the inhibit until it leaves.
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 3, 0.04)
    assert 'foreign publisher' in lock.decide(0.04).reason and '/spoofer' in lock.decide(0.04).reason
    left = lock.on_graph({SCANNER: '/scanner_interface'}, {SUPERVISOR: '/safety_supervisor'})
    assert [(f.code, f.active) for f in left] == [(FOREIGN_SCANNER, False)]
    assert not lock.decide(0.05).inhibit


def test_imaging_from_any_source_inhibits():
    lock = ready()
    lock.on_scanner(ROGUE, '/other_bridge', 'ACQUIRING', 1, 0.01)
    assert lock.decide(0.01) == (True, "scanner ACQUIRING (from foreign node '/other_bridge')")
    lock.on_scanner('gid-unnamed', '', 'PREPARING', 1, 0.02)   # not yet on the graph: imaging still counts
    lock2 = ready()
    lock2.on_scanner('gid-unnamed', '', 'PREPARING', 1, 0.02)
    assert lock2.decide(0.02).inhibit
    lock2.on_scanner('gid-unnamed', '', 'IDLE', 2, 0.03)      # ... but its IDLE never does
    assert lock2.decide(0.03).inhibit


def test_a_second_publisher_under_the_scanner_name_is_foreign():
    lock = ready()
    findings = lock.on_scanner(ROGUE, '/scanner_interface', 'IDLE', 5, 0.01)
    assert findings and findings[0].code == FOREIGN_SCANNER
    assert lock.decide(0.01).inhibit
    # A restarted scanner (the old publisher silent beyond the timeout) is accepted under its new id.
    lock2 = ready()
    assert lock2.on_scanner('gid-new', '/scanner_interface', 'IDLE', 1, 1.0) == []
    assert not lock2.decide(1.0).inhibit


def test_permission_only_from_the_supervisor():
    lock = Interlock(InterlockConfig())
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 1, 0.0)
    findings = lock.on_permission(ROGUE, '/spoofer', True, 0.0)
    assert [(f.code, f.node) for f in findings] == [(FOREIGN_PERMISSION, '/spoofer')]
    assert lock.decide(0.0).inhibit
    assert lock.ignored_permissions == 1
    lock.on_permission(SUPERVISOR, '/safety_supervisor', True, 0.0)
    assert lock.decide(0.0).inhibit                       # the foreign publisher is still there
    lock.on_graph({SCANNER: '/scanner_interface'}, {SUPERVISOR: '/safety_supervisor'})
    assert not lock.decide(0.0).inhibit


def test_graph_names_a_silent_foreign_publisher():
    lock = ready()
    findings = lock.on_graph({SCANNER: '/scanner_interface', ROGUE: '/lurker'}, {SUPERVISOR: '/safety_supervisor'})
    assert [(f.code, f.node) for f in findings] == [(FOREIGN_SCANNER, '/lurker')]
    assert lock.decide(0.0).inhibit


def test_supervisor_liveliness_and_drive_state():
    lock = ready()
    lock.on_supervisor_liveliness(False)
    assert lock.decide(0.0).reason == 'safety supervisor lost (liveliness)'
    lock.on_permission(SUPERVISOR, 'safety_supervisor', True, 0.0)
    assert not lock.decide(0.0).inhibit
    lock.on_drive(faults=['WATCHDOG'])
    assert lock.decide(0.0) == (True, 'drive faults latched: WATCHDOG')
    lock.on_drive(estopped=True)
    assert lock.decide(0.0).reason == 'e-stop latched in the drive'
    lock.on_drive(inhibited=True)
    assert lock.decide(0.0).inhibit
    lock.on_drive(inhibited=False)
    assert not lock.decide(0.0).inhibit
    lock.set_active(False)
    assert lock.decide(0.0) == (True, 'not active')


def test_node_key():
    assert node_key('a') == '/a' and node_key('/a') == '/a' and node_key('a', '/ns') == '/ns/a'
    assert Interlock(InterlockConfig()).scanner_phase(0.0) is ScannerPhase.UNKNOWN


def test_a_restarted_supervisor_is_accepted_once_its_old_publisher_is_silent():
    lock = ready()
    findings = lock.on_permission('gid-impostor', '/safety_supervisor', True, 0.5)   # the original still speaks
    assert findings and findings[0].code == FOREIGN_PERMISSION
    lock2 = ready()
    assert lock2.on_permission('gid-restarted', '/safety_supervisor', True, 2.0) == []
    lock2.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 2, 2.0)
    assert not lock2.decide(2.0).inhibit


def test_a_lingering_killed_source_on_the_graph_is_not_foreign():
    lock = ready()
    assert lock.on_graph({SCANNER: '/scanner_interface', 'gid-old': '/scanner_interface'},
                         {SUPERVISOR: '/safety_supervisor'}) == []
    assert not lock.decide(0.0).inhibit


def test_the_trigger_level_is_the_scanner_part_alone():
    """The trigger port's relay: imaging, stale, absent and foreign imaging raise it; permission, the supervisor,
    the drive and a foreign publisher that says nothing do not."""
    lock = Interlock(InterlockConfig(scanner_timeout=0.2))
    assert lock.trigger_level(0.0) == (True, 'no scanner state received from /scanner_interface')
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 1, 0.0)
    assert lock.trigger_level(0.0) == (False, 'scanner idle')
    assert lock.decide(0.0).inhibit                         # no permission: the hardware node still inhibits
    lock.on_drive(faults=['WATCHDOG'], estopped=True)
    assert not lock.trigger_level(0.0).inhibit
    lock.on_graph({SCANNER: '/scanner_interface', ROGUE: '/rogue'})
    assert not lock.trigger_level(0.0).inhibit and lock.decide(0.0).inhibit
    lock.on_scanner(ROGUE, '/rogue', 'ACQUIRING', 1, 0.05)
    assert lock.trigger_level(0.05) == (True, "scanner ACQUIRING (from foreign node '/rogue')")
    lock.on_scanner(ROGUE, '/rogue', 'IDLE', 2, 0.06)       # a foreign IDLE ends its own imaging only
    lock.on_scanner(SCANNER, 'scanner_interface', 'ACQUIRING', 2, 0.07)
    assert lock.trigger_level(0.07) == (True, 'scanner ACQUIRING')
    lock.on_scanner(SCANNER, 'scanner_interface', 'IDLE', 3, 0.08)
    assert not lock.trigger_level(0.27).inhibit
    assert 'stale' in lock.trigger_level(0.29).reason      # silence: imaging
    lock.on_scanner('gid-new', '', 'PREPARING', 1, 0.3)    # not named by the graph yet: believed
    assert lock.trigger_level(0.3) == (True, 'scanner PREPARING (from a publisher not yet on the graph)')
