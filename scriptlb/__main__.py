from scriptlb.cli import main

raise SystemExit(main())
