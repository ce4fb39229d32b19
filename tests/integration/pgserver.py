"""Integration-test PostgreSQL: the lab's private server plus login roles, one per pg_hba auth method."""
from __future__ import annotations

import dataclasses

from multiproxy.lab.postgres import INSTALL_HINT, OS_USER, SUPERUSER, find_bindir
from multiproxy.lab.postgres import PostgresServer as _LabPostgresServer

__all__ = ["AUTH_DB", "AUTH_ROLES", "AuthRole", "INSTALL_HINT", "OS_USER", "PostgresServer", "SUPERUSER",
           "find_bindir"]


@dataclasses.dataclass(frozen=True)
class AuthRole:
    """A login role that authenticates over TCP with one pg_hba method."""

    name: str
    password: str | None
    method: str  # the pg_hba.conf method
    stored_as: str | None  # password_encryption used when the password was set


AUTH_ROLES = (
    AuthRole("mp_scram", "scram-pw", "scram-sha-256", "scram-sha-256"),
    AuthRole("mp_md5", "md5-pw", "md5", "md5"),
    AuthRole("mp_clear", "clear-pw", "password", "scram-sha-256"),
    AuthRole("mp_trust", None, "trust", None),
)
AUTH_DB = "mpdb"


class PostgresServer(_LabPostgresServer):
    """The lab's PostgresServer with create_auth_roles() for the authentication tests."""

    _roles_created = False

    def create_auth_roles(self) -> None:
        """Create AUTH_ROLES and database AUTH_DB, and route each role to its auth method in pg_hba.conf."""
        if self._roles_created:
            return
        for role in AUTH_ROLES:
            setup = f"SET password_encryption = '{role.stored_as}';\n" if role.stored_as else ""
            password = f" PASSWORD '{role.password}'" if role.password is not None else ""
            self.psql(f"{setup}CREATE ROLE {role.name} LOGIN NOCREATEDB NOSUPERUSER{password};")
        owner = next(r.name for r in AUTH_ROLES if r.method == "trust")
        names = ", ".join(r.name for r in AUTH_ROLES)
        self.psql(f"CREATE DATABASE {AUTH_DB} OWNER {owner};")
        self.psql(f"GRANT ALL ON DATABASE {AUTH_DB} TO {names};")
        self.psql(f"GRANT ALL ON SCHEMA public TO {names};", db=AUTH_DB)
        self.add_hba_lines([f"host all {r.name} 127.0.0.1/32 {r.method}" for r in AUTH_ROLES])
        self._roles_created = True
