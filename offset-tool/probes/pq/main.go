// Command pq links lib/pq's Error so that offset-tool can read its layout from DWARF
// (the SQLSTATE and message database spans report).
package main

import (
	"errors"
	"fmt"

	"github.com/lib/pq"
)

func main() {
	var err error = &pq.Error{Code: "42601", Message: "syntax error"}
	var pe *pq.Error
	fmt.Println(errors.As(err, &pe), pe.Code, pe.Message)
}
