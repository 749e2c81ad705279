"""``python -m simprune.cli`` (torchrun uses this form)."""
from simprune.cli.main import main

raise SystemExit(main())
