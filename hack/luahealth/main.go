// Command luahealth runs an Argo CD resource health script the way Argo CD does:
// with the same Lua interpreter (gopher-lua), the resource bound to the global
// `obj` as a Lua table, and the script's returned table read as {status, message}.
//
//	luahealth SCRIPT.lua < resource.json   prints {"status":"...","message":"..."}
//
// It exists so the chart's health script is tested against the interpreter Argo CD
// embeds rather than a lookalike.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: luahealth SCRIPT.lua < resource.json")
		os.Exit(2)
	}
	var obj any
	if err := json.NewDecoder(os.Stdin).Decode(&obj); err != nil {
		fail("decoding the resource: %v", err)
	}
	// Argo CD opens only these libraries for health scripts (no os, io or package).
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.StringLibName, lua.OpenString},
		{lua.MathLibName, lua.OpenMath},
	} {
		L.Push(L.NewFunction(lib.open))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoFile(os.Args[1]); err != nil {
		fail("running the script: %v", err)
	}
	ret, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		fail("the script returned %s, not a table", L.Get(-1).Type())
	}
	out := map[string]string{
		"status":  lua.LVAsString(ret.RawGetString("status")),
		"message": lua.LVAsString(ret.RawGetString("message")),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing the result: %v", err)
	}
}

// toLua converts decoded JSON into Lua values: objects and arrays become tables
// (arrays 1-based, as Argo CD's conversion makes them), null becomes nil.
func toLua(L *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		t := L.NewTable()
		for _, e := range v {
			t.Append(toLua(L, e))
		}
		return t
	case map[string]any:
		t := L.NewTable()
		for k, e := range v {
			t.RawSetString(k, toLua(L, e))
		}
		return t
	default:
		fail("unexpected JSON value %T", v)
		return lua.LNil
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "luahealth: "+format+"\n", args...)
	os.Exit(1)
}
