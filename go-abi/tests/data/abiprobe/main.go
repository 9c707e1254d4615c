// Command abiprobe has functions with varied signatures so that tests can compare
// the register assignment computed by go-abi with the compiler's own DWARF.
package main

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"unsafe"
)

var sink any

type Small struct {
	A int32
	B bool
	C int64
}

type Mixed struct {
	F float64
	I int
	G float32
	C complex64
}

type Nested struct {
	S   Small
	M   Mixed
	Str string
}

type TrailingZero struct {
	A int64
	Z struct{}
}

type WithArray struct {
	N int
	A [2]int
}

type OneElem struct {
	A [1]string
	F [1][1]float64
}

type ZeroArr struct {
	A [0]int
	B int16
}

type Empty struct{}

type EmptyArrayField struct {
	N int
	Z [2]struct{}
}

type Embeds struct {
	Small
	*Store
	Tag string
}

type Celsius float64

type IDs []int

type Index map[string]int

type Handler func(string) error

type List[T any] struct {
	items []T
	last  T
}

type Store struct {
	name  string
	items map[string]int
}

type Shape interface {
	Area() float64
}

type Rect struct{ W, H float64 }

//go:noinline
func (r Rect) Area() float64 { return r.W * r.H }

//go:noinline
func (s *Store) Get(key string) (int, bool) {
	v, ok := s.items[key]
	return v, ok
}

//go:noinline
func (s Store) Name(prefix string, n int) string {
	return prefix + s.name + fmt.Sprint(n)
}

//go:noinline
func (e Empty) Method(a int, b string) int { return a + len(b) }

//go:noinline
func Ints(a int8, b int16, c int32, d int64, e uint8, f uint16, g uint32, h uint64, i uintptr) uint64 {
	return uint64(a) + uint64(b) + uint64(c) + uint64(d) + uint64(e) + uint64(f) + uint64(g) + h + uint64(i)
}

//go:noinline
func TooManyInts(a, b, c, d, e, f, g, h, i, j, k int) int {
	return a + b + c + d + e + f + g + h + i + j + k
}

//go:noinline
func StringAfterEight(a, b, c, d, e, f, g, h int, s string, x int) int {
	return a + b + c + d + e + f + g + h + len(s) + x
}

//go:noinline
func Floats(a float32, b float64, c complex64, d complex128, e bool) float64 {
	if e {
		return float64(a) + b + float64(real(c)) + imag(d)
	}
	return float64(imag(c)) + real(d)
}

//go:noinline
func ManyFloats(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q float64) float64 {
	return a + b + c + d + e + f + g + h + i + j + k + l + m + n + o + p + q
}

//go:noinline
func ComplexOverflow(a, b, c, d, e, f, g complex128, x float64, y complex128) complex128 {
	return a + b + c + d + e + f + g + complex(x, 0) + y
}

//go:noinline
func Pointers(p *int, m map[string]int, ch chan int, fn func(int) int, u unsafe.Pointer) int {
	return *p + m["a"] + len(ch) + fn(1) + int(uintptr(u)&1)
}

//go:noinline
func Strings(s string, b []byte, ss []string) (string, int) {
	return s + string(b), len(ss)
}

//go:noinline
func Interfaces(a any, e error, s Shape) string {
	return fmt.Sprint(a, e, s.Area())
}

//go:noinline
func Structs(s Small, m Mixed, n Nested) float64 {
	return float64(s.A) + m.F + float64(n.S.C) + float64(len(n.Str)) + float64(m.G)
}

//go:noinline
func ArrayArgs(a [2]int, b [1]string, c [0]int, d OneElem, e WithArray, f int) int {
	return a[0] + a[1] + len(b[0]) + len(c) + len(d.A[0]) + int(d.F[0][0]) + e.N + e.A[1] + f
}

//go:noinline
func ZeroSized(a struct{}, b int, c Empty, d [0]string, e TrailingZero, f ZeroArr, g int8) int {
	_ = a
	_ = c
	_ = d
	return b + int(e.A) + int(f.B) + int(g)
}

//go:noinline
func BigStruct(n Nested, m Nested, x int) int {
	return len(n.Str) + len(m.Str) + x + int(n.S.C) + int(m.M.I)
}

//go:noinline
func StackResults(a int) (r1 [2]int, r2 string, r3 Nested, r4 int) {
	r1[0] = a
	r1[1] = a + 1
	r2 = "x"
	r3.Str = "y"
	r4 = a * 2
	return
}

//go:noinline
func ManyResults(a string) (int, int, int, int, int, int, int, int, int, int, string) {
	return 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, a
}

//go:noinline
func StackArgsAndResults(a [3]int8, b int, c [2]float32) ([2]int16, float64) {
	return [2]int16{int16(a[0]), int16(b)}, float64(c[1])
}

//go:noinline
func Variadic(format string, args ...any) string {
	return fmt.Sprintf(format, args...)
}

//go:noinline
func Unnamed(int, string, float64) (int, error) {
	return 0, errors.New("unnamed")
}

//go:noinline
func Blank(a int, _ string, c float64) (_ int, r float64) {
	return a, c
}

//go:noinline
func Unused(a int, b string, c []int) int {
	return 7
}

//go:noinline
func Map[K comparable, V any](m map[K]V, k K) (V, bool) {
	v, ok := m[k]
	return v, ok
}

//go:noinline
func Sum[T int | float64](xs []T) T {
	var s T
	for _, x := range xs {
		s += x
	}
	return s
}

//go:noinline
func AddrTaken(a int, s string) *int {
	p := &a
	sink = &s
	return p
}

//go:noinline
func Mixed3(a int32, f float32, b bool, g float64, c uint8, s Small, h float32) (float32, int32) {
	if b {
		return f + h + float32(g), a + int32(c) + s.A
	}
	return 0, 0
}

//go:noinline
func BlankFirst(_ string, c int, _ float32, d []byte) int {
	return c + len(d)
}

//go:noinline
func Named(c Celsius, ids IDs, idx Index, h Handler, r rune, b byte, u uint, i int) Celsius {
	if h != nil {
		_ = h("x")
	}
	return c + Celsius(len(ids)+len(idx)+int(r)+int(b)+int(u)+i)
}

//go:noinline
func EmbedsAndEmpty(e Embeds, z EmptyArrayField, x int) int {
	return int(e.A) + len(e.Tag) + z.N + x
}

//go:noinline
func (l *List[T]) Push(v T) int {
	l.items = append(l.items, v)
	l.last = v
	return len(l.items)
}

//go:noinline
func (l List[T]) Last(def T, ok bool) T {
	if ok && len(l.items) > 0 {
		return l.last
	}
	return def
}

//go:noinline
func Apply[T any, U any](xs []T, f func(T) U) []U {
	out := make([]U, 0, len(xs))
	for _, x := range xs {
		out = append(out, f(x))
	}
	return out
}

//go:noinline
func Mixed4(a string, f float64, b []int, g float32, c Small, d complex128, e any) float64 {
	return float64(len(a)+len(b)+int(c.C)) + f + float64(g) + real(d) + float64(len(fmt.Sprint(e)))
}

// signatures maps DWARF function names to the functions, so that reflect can describe
// every parameter, including blank and unnamed ones that DWARF may leave out.
var signatures = map[string]any{
	"main.Rect.Area":                           Rect.Area,
	"main.(*Rect).Area":                        (*Rect).Area,
	"main.(*Store).Get":                        (*Store).Get,
	"main.Store.Name":                          Store.Name,
	"main.Empty.Method":                        Empty.Method,
	"main.Ints":                                Ints,
	"main.TooManyInts":                         TooManyInts,
	"main.StringAfterEight":                    StringAfterEight,
	"main.Floats":                              Floats,
	"main.ManyFloats":                          ManyFloats,
	"main.ComplexOverflow":                     ComplexOverflow,
	"main.Pointers":                            Pointers,
	"main.Strings":                             Strings,
	"main.Interfaces":                          Interfaces,
	"main.Structs":                             Structs,
	"main.ArrayArgs":                           ArrayArgs,
	"main.ZeroSized":                           ZeroSized,
	"main.BigStruct":                           BigStruct,
	"main.StackResults":                        StackResults,
	"main.ManyResults":                         ManyResults,
	"main.StackArgsAndResults":                 StackArgsAndResults,
	"main.Variadic":                            Variadic,
	"main.Unnamed":                             Unnamed,
	"main.Blank":                               Blank,
	"main.BlankFirst":                          BlankFirst,
	"main.Unused":                              Unused,
	"main.AddrTaken":                           AddrTaken,
	"main.Mixed3":                              Mixed3,
	"main.Mixed4":                              Mixed4,
	"main.Named":                               Named,
	"main.EmbedsAndEmpty":                      EmbedsAndEmpty,
	"main.Sum[go.shape.int]":                   Sum[int],
	"main.Sum[go.shape.float64]":               Sum[float64],
	"main.Map[go.shape.string,go.shape.int]":   Map[string, int],
	"main.(*List[go.shape.string]).Push":       (*List[string]).Push,
	"main.List[go.shape.float64].Last":         List[float64].Last,
	"main.Apply[go.shape.int,go.shape.string]": Apply[int, string],
}

// describe writes a type in the small grammar the Rust test parses.
func describe(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Pointer:
		return "ptr"
	case reflect.Map:
		return "map"
	case reflect.Chan:
		return "chan"
	case reflect.Func:
		return "func"
	case reflect.UnsafePointer:
		return "unsafeptr"
	case reflect.Slice:
		return "slice"
	case reflect.Interface:
		if t.NumMethod() == 0 {
			return "eface"
		}
		return "iface"
	case reflect.Array:
		return fmt.Sprintf("array(%d,%s)", t.Len(), describe(t.Elem()))
	case reflect.Struct:
		fields := make([]string, t.NumField())
		for i := range fields {
			f := t.Field(i)
			fields[i] = fmt.Sprintf("%s@%d:%s", f.Name, f.Offset, describe(f.Type))
		}
		return fmt.Sprintf("struct(%d){%s}", t.Size(), strings.Join(fields, ","))
	default:
		// bool, string and the numeric kinds are spelled as reflect spells them.
		return t.Kind().String()
	}
}

func printSignatures() {
	for name, fn := range signatures {
		t := reflect.TypeOf(fn)
		in := make([]string, t.NumIn())
		for i := range in {
			in[i] = describe(t.In(i))
		}
		out := make([]string, t.NumOut())
		for i := range out {
			out[i] = describe(t.Out(i))
		}
		fmt.Printf("SIG\t%s\t%s\t%s\n", name, strings.Join(in, ";"), strings.Join(out, ";"))
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "sigs" {
		printSignatures()
		return
	}
	x := 1
	st := &Store{name: "s", items: map[string]int{"a": 1}}
	sink = Ints(1, 2, 3, 4, 5, 6, 7, 8, 9)
	sink = TooManyInts(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
	sink = StringAfterEight(1, 2, 3, 4, 5, 6, 7, 8, "s", 10)
	sink = Floats(1, 2, 3, 4, true)
	sink = ManyFloats(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
	sink = ComplexOverflow(1, 2, 3, 4, 5, 6, 7, 8, 9)
	sink = Pointers(&x, st.items, make(chan int), func(i int) int { return i + x }, unsafe.Pointer(&x))
	s, n := Strings("a", []byte("b"), []string{"c"})
	sink = s
	sink = n
	sink = Interfaces(1, errors.New("e"), Rect{1, 2})
	sink = Structs(Small{1, true, 2}, Mixed{1, 2, 3, 4}, Nested{Str: "n"})
	sink = ArrayArgs([2]int{1, 2}, [1]string{"a"}, [0]int{}, OneElem{}, WithArray{}, 3)
	sink = ZeroSized(struct{}{}, 1, Empty{}, [0]string{}, TrailingZero{A: 1}, ZeroArr{B: 2}, 3)
	sink = BigStruct(Nested{}, Nested{Str: "m"}, 4)
	r1, r2, r3, r4 := StackResults(5)
	sink = r1
	sink = r2
	sink = r3
	sink = r4
	res := make([]any, 0, 11)
	a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11 := ManyResults("q")
	res = append(res, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11)
	sink = res
	q1, q2 := StackArgsAndResults([3]int8{1, 2, 3}, 4, [2]float32{5, 6})
	sink = q1
	sink = q2
	sink = Variadic("%d %s", 1, "x")
	u1, u2 := Unnamed(1, "x", 2)
	sink = u1
	sink = u2
	sink = Unused(1, "x", nil)
	b1, b2 := Blank(1, "x", 2)
	sink = b1
	sink = b2
	v, ok := st.Get("a")
	sink = v
	sink = ok
	sink = st.Name("p", 2)
	sink = Empty{}.Method(1, "x")
	var sh Shape = Rect{2, 3}
	sink = sh.Area()
	mv, mok := Map(map[string]int{"a": 1}, "a")
	sink = mv
	sink = mok
	sink = Sum([]int{1, 2})
	sink = Sum([]float64{1, 2})
	sink = AddrTaken(1, "x")
	m1, m2 := Mixed3(1, 2, true, 3, 4, Small{}, 5)
	sink = m1
	sink = m2
	sink = BlankFirst("a", 1, 2, nil)
	sink = Named(1, IDs{1}, Index{"a": 1}, func(string) error { return nil }, 'r', 'b', 3, 4)
	sink = EmbedsAndEmpty(Embeds{Tag: "t", Store: st}, EmptyArrayField{N: 1}, 2)
	l := &List[string]{}
	sink = l.Push("a")
	sink = List[float64]{}.Last(1, true)
	sink = Apply([]int{1, 2}, func(i int) string { return fmt.Sprint(i + x) })
	sink = Mixed4("a", 1, []int{2}, 3, Small{}, 4, 5)
	fmt.Fprintln(os.Stdout, "READY", sink != nil)
}
