from specmtp.cli import main

raise SystemExit(main())
