"""`python -m kdkernels` is the `kdkernels` command."""

from kdkernels.cli import main

raise SystemExit(main())
