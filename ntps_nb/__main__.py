from ntps_nb.cli import main

raise SystemExit(main())
