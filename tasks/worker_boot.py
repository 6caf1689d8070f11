"""What the worker server (``tasks.workers.process_pool``) imports before it forks any worker:
the stages whose shards of work run in worker processes. Their objects are then frozen out of
the garbage collector (``gc.freeze``, as Python's docs advise before forking), so a worker's
collections do not walk the ~240k objects it inherits."""

import gc

import tasks.decontaminate  # noqa: F401
import tasks.dedup  # noqa: F401
import tasks.extract  # noqa: F401
import tasks.filter  # noqa: F401

gc.freeze()
