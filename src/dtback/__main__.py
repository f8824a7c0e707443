from dtback.cli import main

raise SystemExit(main())
