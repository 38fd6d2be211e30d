// The demo page served by `quire serve --http-listen` at `/`: one document (named by
// the location's hash) in CodeMirror, the other tabs' edits and cursors live, the
// connection state, and a button that takes the client offline and back.

import { EditorState } from "@codemirror/state";
import { EditorView, keymap } from "@codemirror/view";
import { defaultKeymap, history, historyKeymap } from "@codemirror/commands";
import { Client, IndexedDbStore, type ConnectionState, type DocHandle } from "../src/index.js";
import { quireCollab } from "../src/codemirror.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const docInput = $<HTMLInputElement>("doc");
const status = $<HTMLSpanElement>("status");
const offlineButton = $<HTMLButtonElement>("offline");

// One client id (and one saved state) per tab: two tabs are two clients.
const tab = (sessionStorage.quireTab ??= Math.random().toString(36).slice(2));
const label = (id: bigint) => `client ${String(id).slice(-4)}`;

const docName = () => decodeURIComponent(location.hash.slice(1)) || "notes";

function showState(s: ConnectionState): void {
  status.className = s.state;
  status.textContent = s.state === "disconnected" ? `disconnected, retrying in ${Math.ceil(s.retryInMs / 1000)} s` : s.state;
  offlineButton.textContent = s.state === "offline" ? "Go online" : "Go offline";
}

async function main(): Promise<void> {
  const client = await Client.connect({ url: `ws://${location.host}/ws`, store: new IndexedDbStore("quire-demo", `tab-${tab}`) });
  showState(client.connectionState);
  client.on("state", (s) => {
    showState(s);
    if (s.state === "connected") $("me").textContent = `You are ${label(client.clientId)}.`;
  });
  offlineButton.onclick = () => (client.connectionState.state === "offline" ? client.goOnline() : client.goOffline());

  let view: EditorView | null = null;
  let handle: DocHandle | null = null;
  const show = () => {
    const name = docName();
    docInput.value = name;
    if (handle?.id === name) return;
    view?.destroy();
    handle = client.open(name);
    view = new EditorView({
      parent: $("editor"),
      state: EditorState.create({
        doc: handle.text(),
        extensions: [history(), keymap.of([...defaultKeymap, ...historyKeymap]), EditorView.lineWrapping, quireCollab(handle, { label })],
      }),
    });
    view.focus();
  };
  docInput.onchange = () => {
    location.hash = encodeURIComponent(docInput.value.trim() || "notes");
  };
  window.addEventListener("hashchange", show);
  show();
}

main().catch((e) => {
  status.className = "failed";
  status.textContent = `error: ${e instanceof Error ? e.message : e}`;
});
