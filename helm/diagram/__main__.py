"""`python -m helm.diagram`: render docs/images/architecture.svg and .png."""

from helm.diagram.render import main

raise SystemExit(main())
