from lamina.launch import main

raise SystemExit(main())
