// Command goredis links go-redis's client so that offset-tool can read the layouts inject
// reads from DWARF: a client's options (address, database index).
package main

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

func main() {
	// Nothing listens on port 1: the command fails at once.
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", DB: 2, DialTimeout: time.Second, MaxRetries: -1})
	fmt.Println(c.Get(context.Background(), "k").Err())
	_, err := c.Pipelined(context.Background(), func(p redis.Pipeliner) error {
		p.Incr(context.Background(), "n")
		return nil
	})
	fmt.Println(err, c.Options().Addr)
}
