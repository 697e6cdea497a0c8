from par_demo.cli import main

raise SystemExit(main())
