#!/usr/bin/env python
"""One image, a folder of images, or a video through a vision-language model with iLLaVA token merging.

A thin wrapper over `illava.tools.cli` (also installed as the `illava-run` command); `--help` lists the options.
"""

import sys

from illava.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
