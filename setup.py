"""Packaging for multiproxy: the core package, the built-in engines and the `multiproxy` console script; the lab
(`multiproxy lab`) is the `lab` extra: pip install 'multiproxy[lab]'."""
import logging

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds multiproxy._relay when a C compiler and the Python headers are there; without them the install
    goes on and multiproxy.relay_core uses its pure-Python twin (and logs that it does)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all: setuptools raises before building any extension
            logging.warning("multiproxy: the compiled relay core was not built (%s); the pure-Python relay is used",
                            exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            logging.warning("multiproxy: %s was not built (%s); the pure-Python relay is used", ext.name, exc)


setup(
    name="multiproxy",
    version="0.1.0",
    description="A multi-engine database proxy (PostgreSQL, MySQL/MariaDB, SQL Server TDS) with transaction pooling",
    python_requires=">=3.11",
    # The built-in engines live in engines/ and install as the package multiproxy_engines (a top-level package
    # named "engines" would collide with any other distribution's in site-packages).
    packages=find_packages(include=["multiproxy", "multiproxy.*"])
    + ["multiproxy_engines" + name[len("engines"):] for name in find_packages(include=["engines", "engines.*"])],
    package_dir={"multiproxy_engines": "engines"},
    # The compiled relay core (multiproxy/relay_core.py has its pure-Python twin): optional, see OptionalBuildExt.
    ext_modules=[Extension("multiproxy._relay", ["multiproxy/_relay.c"], depends=["multiproxy/_relay_crypto.h"],
                           optional=True, extra_compile_args=["-O2", "-std=gnu11"])],
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "gevent>=23.9",
        "click>=8.1",
        "dnspython>=2.4",
        "prometheus_client>=0.17",
        # The MySQL engine's RSA key exchange (caching_sha2_password without TLS) and PyJWT's RS256/ES256
        # (JWKS token authentication); the lab extra needs it too.
        "cryptography>=41",
        "PyJWT>=2.8",  # JWT token authentication
    ],
    extras_require={
        # `multiproxy lab` (multiproxy/lab/, see multiproxy.lab.REQUIREMENTS): the TDS lab server transpiles
        # T-SQL to SQLite and makes a self-signed certificate.
        "lab": [
            "sqlglot>=25",
            "cryptography>=41",
        ],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "hypothesis>=6.100",
            "pg8000>=1.30",
            "psycopg[binary]>=3.1",
            "psycopg-pool>=3.2",
            "SQLAlchemy>=2.0",
            "asyncpg>=0.29",
            "pymssql>=2.2",
            "python-tds>=1.15",
            "pyOpenSSL>=23",  # python-tds's TLS (access tokens need an encrypted login)
            "boto3>=1.28",  # RDS IAM tokens in the token-authentication tests
            "PyMySQL>=1.1",
            "mysql-connector-python>=8.0",
            "mariadb>=1.1",
            "selenium>=4.20",  # drives Debian's chromium in the status page test (tools/install-deps.sh installs it)
            "kubernetes-validate>=1.28",  # configs/kubernetes/ against the Kubernetes schemas (test_deploy.py)
            "PyYAML>=6",
        ],
    },
    entry_points={
        "console_scripts": ["multiproxy=multiproxy.cli:main"],
        "multiproxy.engines": [
            "postgres=multiproxy_engines.postgres:PostgresEngine",
            "mysql=multiproxy_engines.mysql:MySQLEngine",
            "tds=multiproxy_engines.tds:TDSEngine",
        ],
    },
)
