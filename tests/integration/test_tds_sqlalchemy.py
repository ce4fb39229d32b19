"""SQLAlchemy 2's mssql dialect (mssql+pymssql) on the TDS lab server, directly and through the proxy: first
connect, create_all, ORM inserts (OUTPUT inserted.id), relationship queries, updates, deletes and drop_all."""
from __future__ import annotations

import threading

import pytest

from .helpers import metric, metrics_text
from .tdskit import DB, LAB_PASSWORD, LAB_USER, LabProcess
from .test_tds_proxy import APP_PASSWORD, APP_USER, start

sqlalchemy = pytest.importorskip("sqlalchemy")
pytest.importorskip("pymssql")
from sqlalchemy import ForeignKey, String, UnicodeText, func, inspect, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship  # noqa: E402

pytestmark = pytest.mark.tds
BACKENDS = 3     # fewer than a quarter of the ORM's pool (SESSIONS)
SESSIONS = 12


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    bio: Mapped[str | None] = mapped_column(UnicodeText)          # NVARCHAR(max)
    books: Mapped[list["Book"]] = relationship(back_populates="author", cascade="all, delete-orphan",
                                               order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey("sa_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = LabProcess(tmp_path_factory.mktemp("tdslab-sqlalchemy"))
    yield server
    server.stop()


def engine_for(host: str, port: int, user: str, password: str, **kw):
    return sqlalchemy.create_engine(f"mssql+pymssql://{user}:{password}@{host}:{port}/{DB}?tds_version=7.4",
                                    pool_timeout=30, **kw)


def round_trip(engine, tag: str) -> None:
    """One author with two books (a long NVARCHAR(max) bio), read back through the relationship, changed, deleted."""
    bio = "\u00e9" * 6000
    with Session(engine) as session:
        author = Author(name=f"ada-{tag}", bio=bio, books=[Book(title=f"{tag}-1"), Book(title=f"{tag}-2")])
        session.add(author)
        session.commit()
        assert author.id > 0 and all(b.id > 0 and b.author_id == author.id for b in author.books)
        author_id = author.id
    with Session(engine) as session:
        found = session.scalars(select(Book).join(Author).where(Author.name == f"ada-{tag}").order_by(Book.id)).all()
        assert [(b.title, b.author.name) for b in found] == [(f"{tag}-1", f"ada-{tag}"), (f"{tag}-2", f"ada-{tag}")]
        author = session.get(Author, author_id)
        assert author.bio == bio
        author.books[0].title = f"{tag}-1b"
        session.commit()
        assert session.scalar(select(func.count()).select_from(Book).where(Book.title == f"{tag}-1b")) == 1
        session.delete(author)                       # the books go first (delete-orphan), then the author
        session.commit()
        assert session.scalar(select(func.count()).select_from(Book).where(Book.author_id == author_id)) == 0


@pytest.mark.timeout(120)
def test_orm_round_trip_directly(lab):
    engine = engine_for("127.0.0.1", lab.port, LAB_USER, LAB_PASSWORD)
    try:
        Base.metadata.create_all(engine)
        assert {"sa_authors", "sa_books"} <= set(inspect(engine).get_table_names())
        assert engine.dialect.default_schema_name == "dbo" and engine.dialect.supports_comments is True
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT OBJECT_ID('dbo.sa_books', 'U')").scalar() > 0
            assert conn.exec_driver_sql("SELECT OBJECT_ID('no_such_table')").scalar() is None
            assert conn.exec_driver_sql("SELECT TABLE_NAME FROM INFORMATION_SCHEMA.TABLES WHERE TABLE_TYPE = "
                                        "'BASE TABLE' ORDER BY TABLE_NAME").scalars().all() == ["sa_authors",
                                                                                                 "sa_books"]
            assert conn.exec_driver_sql("SELECT name FROM sys.tables ORDER BY name").scalars().all() == \
                ["sa_authors", "sa_books"]
            row = conn.exec_driver_sql("INSERT INTO sa_authors (name) OUTPUT inserted.* VALUES (N'raw')").one()
            assert row[1:] == ("raw", None) and row[0] > 0
            with pytest.raises(sqlalchemy.exc.IntegrityError, match="547"):   # the FOREIGN KEY is enforced
                conn.exec_driver_sql("INSERT INTO sa_books (title, author_id) VALUES (N'orphan', 99999)")
            conn.rollback()
        round_trip(engine, "direct")
        Base.metadata.drop_all(engine)
        assert not inspect(engine).has_table("sa_books") and not inspect(engine).has_table("sa_authors")
    finally:
        engine.dispose()


@pytest.mark.timeout(240)
def test_orm_sessions_through_the_proxy_outnumber_its_backends(lab, proxy_factory):
    proxy = start(proxy_factory, lab, max_size=BACKENDS, borrow_timeout=10.0)
    engine = engine_for(proxy.host, proxy.port, APP_USER, APP_PASSWORD, pool_size=SESSIONS, max_overflow=0)
    failures: list[str] = []
    barrier = threading.Barrier(SESSIONS)

    def work(i: int) -> None:
        try:
            barrier.wait(60)
            for n in range(3):
                round_trip(engine, f"p{i}-{n}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            failures.append(f"session {i}: {exc!r}")

    try:
        Base.metadata.create_all(engine)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert failures == []
        assert engine.pool.checkedin() > BACKENDS       # the ORM's pool held more connections than the proxy's
        with Session(engine) as session:
            assert session.scalar(select(func.count()).select_from(Author)) == 0
        Base.metadata.drop_all(engine)
        assert not inspect(engine).has_table("sa_authors")
    finally:
        engine.dispose()
    text = metrics_text(proxy)
    assert metric(text, "multiproxy_database_connection_borrow_timeouts_total") == 0
    assert not metric(text, "multiproxy_database_connections_currently_session_pinned")
    assert not metric(text, "multiproxy_pin_reasons_detected_total")
    assert metric(text, "multiproxy_database_connections") <= BACKENDS
