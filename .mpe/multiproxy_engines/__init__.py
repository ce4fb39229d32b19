import os
__path__ = ["/work/wt-mysql/engines"]
