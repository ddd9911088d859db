"""``python -m shardinfer.worker RUN_DIR --rank R --world W``: one worker (see :mod:`shardinfer.worker.loop`)."""

import sys

from shardinfer.worker.loop import main

sys.exit(main())
