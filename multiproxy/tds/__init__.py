"""TDS (SQL Server) protocol code shared by the TDS lab server and the TDS engine; sans-IO, no sockets."""
