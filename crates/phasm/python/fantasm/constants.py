"""The names Fantasm applications import from ``fantasm.constants``."""

# Context keys phasm may set or read (Fantasm's reserved parameters).
STEPS_PARAM = "__step__"
CONTINUATION_PARAM = "__ct__"
GEN_PARAM = "__ge__"
INDEX_PARAM = "__ix__"
WORK_INDEX_PARAM = "__wix__"
FORK_PARAM = "__fk__"
STARTED_AT_PARAM = "__sa__"
FAN_IN_GROUP_PARAM = "__fig__"
CONTINUATION_RESULTS_COUNTER_PARAM = "__crc__"
CONTINUATION_COMPLETE_PARAM = "__cc__"
CONTINUATION_RESULTS_SIZE_PARAM = "__crs__"

# Request parameters Fantasm kept out of the context; several are ``obj`` keys in phasm.
STATE_PARAM = "__st__"
EVENT_PARAM = "__ev__"
INSTANCE_NAME_PARAM = "__in__"
TERMINATED_PARAM = "__tm__"
TASK_NAME_PARAM = "__tn__"
FAN_IN_PARAM = "__fi__"
RETRY_COUNT_PARAM = "__rc__"
FORKED_CONTEXTS_PARAM = "__fc__"
IMMEDIATE_MODE_PARAM = "__im__"
MESSAGES_PARAM = "__ms__"
FAN_IN_CONTEXT_PARAM = "__fic__"

NON_CONTEXT_PARAMS = (
    STATE_PARAM,
    EVENT_PARAM,
    INSTANCE_NAME_PARAM,
    TERMINATED_PARAM,
    TASK_NAME_PARAM,
    FAN_IN_PARAM,
    RETRY_COUNT_PARAM,
    FORKED_CONTEXTS_PARAM,
    IMMEDIATE_MODE_PARAM,
    MESSAGES_PARAM,
    FAN_IN_CONTEXT_PARAM,
)

# ``obj`` keys of continuations.
CONTINUATION_RESULTS_KEY = "results"
CONTINUATION_RESULT_KEY = "result"
CONTINUATION_MORE_RESULTS_KEY = "has_more_results"

# Pseudo states and events.
PSEUDO_INIT = "pseudo-init"
PSEUDO_FINAL = "pseudo-final"

# Defaults Fantasm documented.
DEFAULT_QUEUE_NAME = "default"
DEFAULT_LOG_QUEUE_NAME = DEFAULT_QUEUE_NAME
DEFAULT_CLEANUP_QUEUE_NAME = DEFAULT_QUEUE_NAME
MAX_NAME_LENGTH = 50
NAME_PATTERN = r"^[a-zA-Z0-9-]+$"

# Logging modes.
LOGGING_DEFAULT = "default"
LOGGING_PERSISTENT = "persistent"
