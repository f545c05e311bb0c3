/**
 * Where ctrl keeps its sockets and registry: `--run-dir`, else
 * `$XDG_RUNTIME_DIR/blktap`, else `/run/blktap`.
 * @module
 */

/** The default run directory. */
export function defaultRunDir(): string {
  const xdg = Deno.env.get("XDG_RUNTIME_DIR");
  return xdg ? `${xdg}/blktap` : "/run/blktap";
}

/** Name of the client control socket inside the run dir. */
export const CTRL_SOCKET_NAME = "ctrl.sock";
/** Name of the registry file inside the run dir. */
export const REGISTRY_NAME = "registry.json";
