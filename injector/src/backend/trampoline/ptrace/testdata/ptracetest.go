// Command ptracetest is a target for the ptrace session tests (injector/src/ptrace/tests.rs).
// The tests write it to target/ptrace-test/ and build it with each test Go toolchain.
//
// Every mode prints READY when warmed up, then:
//
//	-mode busy     -workers W goroutines spin computing; every -tick it prints TICK <n>.
//
// In every mode -parked P adds P goroutines locked to their own threads and blocked in read(2)
// on a pipe, so the process has about P more threads.
//	-mode threads  keeps creating and destroying OS threads (goroutines that live 2 ms and exit
//	               while locked to their thread); prints TICK <rounds> every -tick.
//	-mode signals  signal.Notify for SIGUSR1 and SIGUSR2, prints "USR1 <count>" / "USR2 <count>"
//	               for each one received, with -workers spinning goroutines alongside.
//	-mode flood    a CPU profile (SIGPROF) plus a goroutine that sends SIGURG to the process in a
//	               loop plus -workers spinning goroutines: threads are often inside the signal
//	               handler; prints TICK <n> every -tick.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var sink atomic.Uint64

//go:noinline
func spinStep(x uint64) uint64 {
	for i := 0; i < 1000; i++ {
		x = x*6364136223846793005 + 1442695040888963407
	}
	return x
}

func spin() {
	x := uint64(1)
	for {
		x = spinStep(x)
		sink.Add(1)
	}
}

func main() {
	mode := flag.String("mode", "busy", "busy | threads | signals | flood")
	workers := flag.Int("workers", 4, "spinning goroutines")
	tick := flag.Duration("tick", 20*time.Millisecond, "interval between TICK lines (0 = none)")
	parked := flag.Int("parked", 0, "goroutines blocked in read(2), each on its own thread")
	flag.Parse()

	if *parked > 0 {
		var p [2]int
		if err := syscall.Pipe(p[:]); err != nil {
			fmt.Fprintln(os.Stderr, "ptracetest:", err)
			os.Exit(1)
		}
		var started sync.WaitGroup
		for i := 0; i < *parked; i++ {
			started.Add(1)
			go func() {
				runtime.LockOSThread()
				started.Done()
				var b [1]byte
				syscall.Read(p[0], b[:])
			}()
		}
		started.Wait()
	}

	switch *mode {
	case "busy":
		for i := 0; i < *workers; i++ {
			go spin()
		}
	case "threads":
		var rounds atomic.Uint64
		go func() {
			for {
				var wg sync.WaitGroup
				for i := 0; i < 4; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						// Exiting while locked makes the runtime terminate this thread, so the
						// next round has to clone new ones.
						runtime.LockOSThread()
						time.Sleep(2 * time.Millisecond)
					}()
				}
				wg.Wait()
				rounds.Add(1)
			}
		}()
		interval := *tick
		go func() {
			for {
				time.Sleep(interval)
				fmt.Printf("TICK %d\n", rounds.Load())
			}
		}()
		*tick = 0 // the main loop below prints nothing
	case "signals":
		c := make(chan os.Signal, 16)
		signal.Notify(c, syscall.SIGUSR1, syscall.SIGUSR2)
		go func() {
			n1, n2 := 0, 0
			for s := range c {
				if s == syscall.SIGUSR1 {
					n1++
					fmt.Printf("USR1 %d\n", n1)
				} else {
					n2++
					fmt.Printf("USR2 %d\n", n2)
				}
			}
		}()
		for i := 0; i < *workers; i++ {
			go spin()
		}
	case "flood":
		if err := pprof.StartCPUProfile(io.Discard); err != nil {
			fmt.Fprintln(os.Stderr, "ptracetest:", err)
			os.Exit(1)
		}
		pid := os.Getpid()
		go func() {
			for {
				syscall.Kill(pid, syscall.SIGURG)
			}
		}()
		for i := 0; i < *workers; i++ {
			go spin()
		}
	default:
		fmt.Fprintln(os.Stderr, "ptracetest: unknown -mode", *mode)
		os.Exit(2)
	}
	fmt.Println("READY")
	for n := 1; ; n++ {
		if *tick <= 0 {
			select {}
		}
		time.Sleep(*tick)
		fmt.Printf("TICK %d\n", n)
	}
}
