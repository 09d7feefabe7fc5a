"""`python -m ipu_norm.memory ...`: the norm / micro-batch memory comparison (see compare.py)."""

from ipu_norm.memory.compare import main

raise SystemExit(main())
