from accelcore.cli import main

raise SystemExit(main())
