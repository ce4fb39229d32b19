"""`python -m multiproxy`: the same as the `multiproxy` console script."""
from gevent import monkey

monkey.patch_all()

from multiproxy.cli import main  # noqa: E402  (gevent must patch before anything imports socket or ssl)

main()
