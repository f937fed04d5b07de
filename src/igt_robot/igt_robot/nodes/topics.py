"""Names of the stack's topics, services and actions: one place, used by every node, test and tool.

The table with types, publishers and QoS is in docs/contracts.md.
"""
JOINT_STATES = '/joint_states'
ROBOT_STATE = '/robot/state'
ROBOT_DESCRIPTION = '/robot_description'
DIAGNOSTICS = '/diagnostics'
TF = '/tf'
TF_STATIC = '/tf_static'

SCANNER_STATE = '/scanner/state'
SCANNER_SET_STATE = '/scanner/set_state'
SCANNER_DOSE = '/scanner/dose'

SAFETY_STATUS = '/safety/status'
SAFETY_MOTION_PERMITTED = '/safety/motion_permitted'
SAFETY_FAULTS = '/safety/faults'
SAFETY_ESTOP = '/safety/estop'
SAFETY_ACKNOWLEDGE = '/safety/acknowledge'
SAFETY_RESUME = '/safety/resume'
HEARTBEAT = '/heartbeat'

MOVE_GUIDE = '/motion/move_guide'
INSERT_NEEDLE = '/motion/insert_needle'

REGISTRATION_REGISTER = '/registration/register'
REGISTRATION_RESULT = '/registration/result'

PLANNER_PLAN = '/planner/plan'
PLANNER_VALIDATE = '/planner/validate'
PLANNER_CURRENT_PLAN = '/planner/current_plan'
PLANNER_MARKERS = '/planner/markers'

PROCEDURE_EVENTS = '/procedure/events'
PROCEDURE_COMMAND = '/procedure/command'
PROCEDURE_TARGET = '/procedure/target'
PROCEDURE_ENTRY = '/procedure/entry'

# Nodes of the full stack whose /heartbeat the supervisor requires for motion (safety_supervisor
# motion_heartbeats): no motion without the record (recorder_node) and the workflow (procedure_node).
# Set by every launcher of the full stack (igt_robot.demo, launch/igt_stack.launch.py); the control nodes
# alone (tests, `--profile safety`) move without them.
WORKFLOW_HEARTBEAT_NODES = ('recorder_node', 'procedure_node')
