// Command pgx links the pgx structs inject reads so that offset-tool can read their
// layouts from DWARF: pgconn's PgError (SQLSTATE and message), the stdlib driver's
// connectors (the DSN of sql.Open("pgx", dsn); the config of stdlib.OpenDB(config)), a
// Conn's config (server and database), and Batch (its size).
package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

func main() {
	var err error = &pgconn.PgError{Code: "42601", Message: "syntax error"}
	var pe *pgconn.PgError
	fmt.Println(errors.As(err, &pe), pe.Code, pe.Message)
	// Opening makes the driver's connector (no connection is made).
	db, err := sql.Open("pgx", "postgres://offsets@127.0.0.1:1/offsets")
	fmt.Println(db != nil, err)
	cfg, err := pgx.ParseConfig("postgres://offsets@127.0.0.1:1/offsets?connect_timeout=1")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(cfg.Host, cfg.Port, cfg.Database)
	fmt.Println(stdlib.OpenDB(*cfg) != nil)
	b := &pgx.Batch{}
	b.Queue("SELECT 1")
	// Nothing listens on port 1: the connection fails at once.
	if conn, err := pgx.ConnectConfig(context.Background(), cfg); err == nil {
		fmt.Println(conn.SendBatch(context.Background(), b).Close())
	}
	fmt.Println(b.Len())
}
