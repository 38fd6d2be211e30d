// The browser entry point: no Node module and no runtime dependency (the WebSocket is
// the browser's; persistence is IndexedDB). Node programs import `./node.js` as well.
export * from "./protocol.js";
export * from "./ot.js";
export { DocState, TooLargeError, diff, maxOpBytes, patchesWireLen, splitPatch, type Outgoing, type PersistedDoc } from "./doc.js";
export * from "./client.js";
export * from "./store.js";
export { Emitter } from "./events.js";
