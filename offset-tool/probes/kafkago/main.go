// Command kafkago links kafka-go's writer so that offset-tool can read the layouts inject
// reads from DWARF: a writer's topic and broker address, a message's fields, and a
// reader's configuration.
package main

import (
	"context"
	"fmt"
	"time"

	"github.com/segmentio/kafka-go"
)

func main() {
	// Nothing listens on port 1: the write fails at once.
	w := &kafka.Writer{Addr: kafka.TCP("127.0.0.1:1"), Topic: "t", WriteTimeout: time.Second, MaxAttempts: 1}
	err := w.WriteMessages(context.Background(), kafka.Message{Key: []byte("k"), Value: []byte("v")})
	fmt.Println(err, w.Addr.String())
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{"127.0.0.1:1"}, GroupID: "g", Topic: "t"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	m, err := r.FetchMessage(ctx)
	fmt.Println(m.Partition, m.Offset, len(m.Headers), err, r.Close())
}
