import sys

from vllm_otel.cli import main

sys.exit(main())
