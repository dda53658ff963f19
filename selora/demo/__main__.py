"""``python -m selora.demo``: see :func:`selora.demo.cli.main`."""

from selora.demo.cli import main

raise SystemExit(main())
