from memorywall.cli import main

raise SystemExit(main())
