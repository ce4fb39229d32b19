import os
__path__ = ["/work/wt-tds/engines"]
