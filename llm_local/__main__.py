from llm_local.cli import main

raise SystemExit(main())
