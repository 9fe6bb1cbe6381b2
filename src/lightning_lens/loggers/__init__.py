"""One sink layer: images, figures, tables, text, JSON and scalars dispatched over ``trainer.loggers``.

TensorBoard gets images, text (markdown tables) and scalars; W&B gets ``log_image``/``log_table``/``log_text``
aligned with ``trainer/global_step``; CSVLogger and any other logger with a ``log_dir`` get PNG, CSV, markdown and JSON
files under ``<log_dir>/lens/<tag>/``. Only rank zero logs. Tags are confined under the log directory
(:func:`sanitize_tag`), HTML in markdown is escaped, and a logger that fails does not stop the others.
"""

# the package exports exactly sinks' public names (one list to keep up to date)
from lightning_lens.loggers.sinks import *  # noqa: F401,F403
from lightning_lens.loggers.sinks import __all__  # noqa: F401
