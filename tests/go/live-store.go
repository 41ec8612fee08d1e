// A real Go server listening the way Tempo's gRPC server does: a plain
// net.Listen("tcp", addr), which Go >= 1.24 opens as MPTCP when the kernel
// allows it. It answers like the tests' Server: its name and the peer it
// saw, then an echo of what it read.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	addr, name := os.Args[1], os.Args[2]
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s\n", addr)
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			payload, _ := io.ReadAll(c)
			fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
			c.Write(payload)
		}(c)
	}
}
