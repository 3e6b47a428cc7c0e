"""Names of the records and config entries in fedmeta's messages.

Coordinator -> site (every phase): ``config`` (ConfigRecord) with ``experiment`` (the experiment
as JSON), ``phase`` and ``server-round``; ``arrays`` (ArrayRecord) with the broadcast state, sent
in full or, with compressed downlink, as an encoded change (``down``, ``down-method``,
``down-base``).

Site -> coordinator: ``site`` (ConfigRecord with the site's ``name``), ``metrics``
(MetricRecord: counts, summed losses, metrics over whole splits); train replies add ``update``
(ArrayRecord, parameter-shaped) and ``encoding`` (ConfigRecord with the ``method``).

Feature agreement (MEDS sites, before the greeting): a QUERY with phase ``counts`` carrying the
experiment; the site answers with ``site``, ``metrics`` holding only ``min-subjects`` (its k), and
two MetricRecords keyed by code: ``code-counts`` (patients having the code) and
``numeric-counts`` (patients having it with a numeric value), each holding only codes seen in at
least k of its patients.
"""

from __future__ import annotations

# the node config entry that carries the site's patient floor (set by the site worker from its
# policy; read by every handler through fedmeta.sitecore.policy.patient_floor)
MIN_PATIENTS = "min-patients"
#: The floor of a node of fedmeta's simulation (one machine's own data, no site policy), set
#: by the simulation itself; a node with no floor at all releases nothing.
SIMULATED_FLOOR = 1

# records
CONFIG = "config"
ARRAYS = "arrays"
UPDATE = "update"
METRICS = "metrics"
SITE = "site"
ENCODING = "encoding"

# config entries, coordinator -> site
EXPERIMENT = "experiment"
PHASE = "phase"
ROUND = "server-round"
DOWN = "down"
DOWN_METHOD = "down-method"
DOWN_BASE = "down-base"

# phases
HELLO = "hello"
COUNTS = "counts"
TRAIN = "train"
EVALUATE = "evaluate"
#: the federated GLM's Newton step (a TRAIN message): the site returns its rows' summed gradient
#: and Hessian at the coefficients sent (record ``sums``: ``gradient``, ``hessian``) and, in
#: ``metrics``, ``num-examples`` and ``loss-sum`` (the summed negative log-likelihood)
GLM = "glm"
SUMS = "sums"
LOSS_SUM = "loss-sum"

# metrics, site -> coordinator
NUM_EXAMPLES = "num-examples"
N_TASKS = "n-tasks"
N_QUERY = "n-query"
LOSS_BEFORE = "query-loss-before"
LOSS_AFTER = "query-loss-after"
N_TRAIN = "n-train"
N_TEST = "n-test"
ADAPT_STEPS = "adapt-steps"

# secure aggregation: the round config's bounding settings (coordinator -> site)
SECAGG_L2_BOUND = "secagg-l2-bound"
SECAGG_NOISE = "secagg-noise-multiplier"
SECAGG_N_SITES = "secagg-n-sites"

# greeting: the layout θ was built for (coordinator -> site, JSON) and the site's comparison
LAYOUT = "layout"
LAYOUT_OK = "layout-ok"
LAYOUT_EXTRA = "layout-extra"

# feature agreement: the site's thresholded counts (site -> coordinator), code -> patients
CODE_COUNTS = "code-counts"
NUMERIC_COUNTS = "numeric-counts"
MIN_SUBJECTS = "min-subjects"
