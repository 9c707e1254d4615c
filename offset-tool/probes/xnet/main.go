// Command xnet links golang.org/x/net/http2's Framer so that offset-tool can read its
// layout from DWARF (the fields inject writes HTTP/2 header fields through).
package main

import (
	"bytes"
	"fmt"

	"golang.org/x/net/http2"
)

func main() {
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, &buf)
	err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: true})
	fmt.Println(buf.Len(), err)
}
