// A CodeMirror 6 binding (`@quire/client/codemirror`): the editor shows a quire
// document. Local transactions become quire patches; remote patches become transactions
// annotated `remoteEdit` (so they are not sent back); the local selection is sent as
// presence, and the other clients' cursors and selections are drawn with a label.
//
//   const doc = client.open("notes");
//   new EditorView({ state: EditorState.create({ doc: doc.text(), extensions: [quireCollab(doc)] }) });

import { Annotation, RangeSetBuilder, StateEffect, StateField, Transaction, type Extension, type Text } from "@codemirror/state";
import { Decoration, EditorView, ViewPlugin, WidgetType, type DecorationSet, type ViewUpdate } from "@codemirror/view";
import type { DocHandle } from "./client.js";
import type { Patch, Selection } from "./protocol.js";
import { changesToPatches, cpToUnitIn, patchesToChanges, unitToCpIn } from "./cm-changes.js";

export { changesToPatches, patchesToChanges, cpToUnitIn, unitToCpIn };

/** Marks transactions that apply the server's (or a reload's) patches. */
export const remoteEdit = Annotation.define<boolean>();

export interface QuireCollabOptions {
  /** The label drawn at a peer's cursor (default: `peer <client id>`). */
  label?: (clientId: bigint) => string;
  /** A peer's colour (default: a hue from its client id). */
  color?: (clientId: bigint) => string;
}

interface Peer {
  clientId: bigint;
  /** UTF-16 offsets in the editor's document. */
  ranges: { anchor: number; head: number }[];
}

const setPeer = StateEffect.define<Peer>();

/** Other clients' selections, moved through every change until they send new ones. */
const peersField = StateField.define<Map<bigint, Peer>>({
  create: () => new Map(),
  update(peers, tr) {
    let next = peers;
    if (tr.docChanged) {
      next = new Map();
      for (const [id, p] of peers) {
        next.set(id, {
          clientId: id,
          ranges: p.ranges.map((r) => ({ anchor: tr.changes.mapPos(r.anchor), head: tr.changes.mapPos(r.head) })),
        });
      }
    }
    for (const e of tr.effects) {
      if (!e.is(setPeer)) continue;
      if (next === peers) next = new Map(peers);
      if (e.value.ranges.length === 0) next.delete(e.value.clientId);
      else next.set(e.value.clientId, e.value);
    }
    return next;
  },
});

/** A hue per client, 137 degrees apart for consecutive ids (the server hands out
 * consecutive ids, so two tabs opened one after the other get colours far apart). */
export function defaultColor(clientId: bigint): string {
  return `hsl(${Number((clientId * 137n) % 360n)}, 70%, 45%)`;
}

class CaretWidget extends WidgetType {
  constructor(
    readonly label: string,
    readonly color: string,
  ) {
    super();
  }
  override eq(other: CaretWidget): boolean {
    return other.label === this.label && other.color === this.color;
  }
  toDOM(): HTMLElement {
    const caret = document.createElement("span");
    caret.className = "cm-quire-caret";
    caret.style.borderLeftColor = this.color;
    const label = document.createElement("span");
    label.className = "cm-quire-label";
    label.textContent = this.label;
    label.style.backgroundColor = this.color;
    caret.appendChild(label);
    return caret;
  }
  override ignoreEvent(): boolean {
    return true;
  }
}

function peerDecorations(peers: Map<bigint, Peer>, docLen: number, opts: Required<QuireCollabOptions>): DecorationSet {
  const items: { from: number; to: number; deco: Decoration }[] = [];
  for (const p of peers.values()) {
    const color = opts.color(p.clientId);
    const label = opts.label(p.clientId);
    for (const r of p.ranges) {
      const from = Math.min(r.anchor, r.head, docLen);
      const to = Math.min(Math.max(r.anchor, r.head), docLen);
      if (from < to) {
        items.push({ from, to, deco: Decoration.mark({ class: "cm-quire-selection", attributes: { style: `background-color: color-mix(in srgb, ${color} 25%, transparent)` } }) });
      }
      const head = Math.min(r.head, docLen);
      items.push({ from: head, to: head, deco: Decoration.widget({ widget: new CaretWidget(label, color), side: 1 }) });
    }
  }
  items.sort((a, b) => a.from - b.from || a.deco.startSide - b.deco.startSide);
  const builder = new RangeSetBuilder<Decoration>();
  for (const it of items) builder.add(it.from, it.to, it.deco);
  return builder.finish();
}

const theme = EditorView.baseTheme({
  ".cm-quire-caret": { position: "relative", borderLeft: "2px solid", marginLeft: "-1px", marginRight: "-1px" },
  ".cm-quire-label": {
    position: "absolute",
    top: "-1.3em",
    left: "-2px",
    fontSize: "0.75em",
    lineHeight: "1.2",
    color: "white",
    padding: "0 3px",
    borderRadius: "3px",
    whiteSpace: "nowrap",
    pointerEvents: "none",
    userSelect: "none",
  },
});

/** The selection of `state` as quire presence (code points). */
function presenceOf(doc: Text, ranges: readonly { anchor: number; head: number }[]): Selection[] {
  return ranges.map((r) => ({ anchor: unitToCpIn(doc, r.anchor), head: unitToCpIn(doc, r.head) }));
}

/**
 * The binding for `handle`: start the editor with `handle.text()` as its document (it
 * is replaced by the handle's text otherwise).
 */
export function quireCollab(handle: DocHandle, options: QuireCollabOptions = {}): Extension {
  const opts: Required<QuireCollabOptions> = {
    label: options.label ?? ((id) => `peer ${id}`),
    color: options.color ?? defaultColor,
  };

  const plugin = ViewPlugin.fromClass(
    class {
      decorations: DecorationSet;
      private readonly off: (() => void)[] = [];

      constructor(readonly view: EditorView) {
        this.decorations = peerDecorations(view.state.field(peersField), view.state.doc.length, opts);
        const applyRemote = (patches: Patch[]) => {
          try {
            const changes = patchesToChanges(this.view.state.doc, patches);
            this.view.dispatch({ changes, annotations: [remoteEdit.of(true), Transaction.addToHistory.of(false)] });
          } catch {
            this.resync();
          }
        };
        this.off.push(handle.on("remote", ({ patches }) => applyRemote(patches)));
        this.off.push(handle.on("reloaded", ({ patches }) => applyRemote(patches)));
        this.off.push(
          handle.on("presence", ({ clientId, selections }) => {
            const doc = this.view.state.doc;
            const ranges = selections.map((s) => ({ anchor: cpToUnitIn(doc, s.anchor), head: cpToUnitIn(doc, s.head) }));
            this.view.dispatch({ effects: setPeer.of({ clientId, ranges }) });
          }),
        );
        // The selection goes out at once, ahead of the edits it is in (they wait for the
        // server's ack, one op at a time): the others clamp it to the text they have and
        // it stays where it landed. Once every edit is acknowledged the others have them
        // all (the server sent them before the ack), and the selection is sent again.
        this.off.push(
          handle.on("ack", () => {
            if (!handle.pending) this.sendPresence();
          }),
        );
        if (view.state.doc.toString() !== handle.text()) queueMicrotask(() => this.resync());
        this.sendPresence();
      }

      /** Shows the handle's text (when the editor and the document disagree). */
      resync(): void {
        const text = handle.text();
        if (this.view.state.doc.toString() === text) return;
        this.view.dispatch({ changes: { from: 0, to: this.view.state.doc.length, insert: text }, annotations: [remoteEdit.of(true), Transaction.addToHistory.of(false)] });
      }

      sendPresence(): void {
        handle.setPresence(presenceOf(this.view.state.doc, this.view.state.selection.ranges));
      }

      update(update: ViewUpdate): void {
        let failed = false;
        for (const tr of update.transactions) {
          if (!tr.docChanged || tr.annotation(remoteEdit) || failed) continue;
          try {
            void handle.edit(changesToPatches(tr.startState.doc, tr.changes)).catch(() => {});
          } catch (e) {
            // Refused (too large, or the texts disagree): the editor shows the document again.
            console.warn("quire: edit refused:", e instanceof Error ? e.message : e);
            failed = true;
          }
        }
        if (failed) setTimeout(() => this.resync());
        if (update.docChanged || update.transactions.some((tr) => tr.effects.some((e) => e.is(setPeer)))) {
          this.decorations = peerDecorations(update.state.field(peersField), update.state.doc.length, opts);
        }
        if (update.selectionSet || (update.docChanged && update.transactions.some((tr) => !tr.annotation(remoteEdit)))) {
          this.sendPresence();
        }
      }

      destroy(): void {
        for (const off of this.off) off();
      }
    },
    { decorations: (v) => v.decorations },
  );

  return [peersField, plugin, theme];
}
