"""``python -m shardinfer.worker RUN_DIR --launcher NAME ...``: one worker (see :mod:`shardinfer.worker.entry`)."""

import sys

from shardinfer.worker.entry import main

sys.exit(main())
